// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {IAccessLog} from "./IAccessLog.sol";
import {IConsentRegistry} from "./IConsentRegistry.sol";

/// @dev See {IAccessLog}.
contract AccessLog is IAccessLog, AccessControl {
    bytes32 public constant ACCESSOR_ROLE = keccak256("ACCESSOR_ROLE");

    IConsentRegistry private immutable _registry;
    bytes32 private _head;
    uint256 private _count;

    /**
     * @dev Grants the admin role to `admin` and the accessor role to `accessor`.
     *
     * Requirements:
     * - none of the addresses is zero.
     */
    constructor(address admin, address accessor, IConsentRegistry registry_) {
        if (admin == address(0) || accessor == address(0) || address(registry_) == address(0)) {
            revert AccessLogZeroAddress();
        }
        _registry = registry_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(ACCESSOR_ROLE, accessor);
    }

    /// @inheritdoc IAccessLog
    function record(Access[] calldata entries) external onlyRole(ACCESSOR_ROLE) returns (uint256 permitted) {
        if (entries.length == 0) revert AccessLogEmptyBatch();
        bytes32 chain = _head;
        uint256 index = _count;
        for (uint256 i = 0; i < entries.length; ++i) {
            Access calldata e = entries[i];
            bool allowed = _registry.isPermitted(e.subject, e.partner, e.purpose, e.attributes);
            chain = keccak256(abi.encode(chain, index, e.subject, e.partner, e.purpose, e.attributes, e.requestId, allowed));
            emit AccessRecorded(index, e.subject, e.partner, e.purpose, e.attributes, e.requestId, allowed, chain);
            if (allowed) ++permitted;
            ++index;
        }
        _head = chain;
        _count = index;
    }

    /// @inheritdoc IAccessLog
    function head() external view returns (bytes32) {
        return _head;
    }

    /// @inheritdoc IAccessLog
    function count() external view returns (uint256) {
        return _count;
    }

    /// @inheritdoc IAccessLog
    function registry() external view returns (address) {
        return address(_registry);
    }
}
